"""Export in the compressed-tensors format that vLLM and transformers load.

Quantised (RTN or GPTQ int4/int8, symmetric or asymmetric, per group or per row): the quantised
linears are written ``pack-quantized`` (codes packed into int32 words, ``weight_scale``,
packed ``weight_zero_point`` when asymmetric, ``weight_shape``) by compressed-tensors' own
``PackedQuantizationCompressor``, and ``config.json`` gets the ``quantization_config`` that
compressed-tensors' ``ModelCompressor.update_config`` writes (one config group targeting
``Linear``, every other linear in ``ignore``). Each packed linear is decompressed again with
the library and must equal the in-memory weight bit for bit, or nothing is written.

Not quantised: the dense safetensors folder with no ``quantization_config`` (every loader
reads it). Both carry the sparsity metadata (``export.metadata``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wanda_pipeline.errors import ConfigError, RunError
from wanda_pipeline.export.metadata import CONFIG_KEY, validated
from wanda_pipeline.quantizers.rtn import RTNCodes
from wanda_pipeline.saving import PROVENANCE_FILE, atomic_folder


def _require_library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConfigError("the compressed-tensors format needs the `compressed-tensors` package "
                          "(pip install 'compressed-tensors==0.20.0'), or choose format 'hf'") from None


def check_group_size(in_features: dict[str, int], group_size: int) -> int | None:
    """The compressed-tensors group size for these linears: None for per-row (every group
    spans a whole row), ``group_size`` if it divides every ``in_features``. Raises otherwise."""
    if all(group_size >= n for n in in_features.values()):
        return None
    bad = {k: n for k, n in in_features.items() if n % group_size}
    if bad:
        name, n = next(iter(bad.items()))
        raise ConfigError(
            f"quantizer group_size {group_size} does not divide in_features {n} of {name} "
            f"({len(bad)} linear(s) affected); compressed-tensors stores whole groups only. Choose a group size "
            f"that divides every linear's in_features (e.g. 32, 64, 128), or one >= all of them (per row)")
    return group_size


def _check_quantizer(model: nn.Module, quantizer: Any) -> None:
    from wanda_pipeline.engine.source import STREAM_ATTR

    _require_library()
    if not hasattr(quantizer, "codes_for"):
        raise ConfigError(f"quantizer {type(quantizer).__name__} does not expose its integer codes (`codes_for`); "
                          f"the compressed-tensors format needs them. Use the rtn or gptq quantizer or format 'hf'")
    if getattr(model, STREAM_ATTR, None):  # its weights are in shards, never whole in memory
        raise ConfigError("a streamed model (engine.stream) cannot be exported quantized in compressed-tensors "
                          "format yet; save it as format 'hf' (the quantized weights, dequantised) or drop stream")
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} uses Conv1D linears, which compressed-tensors does not pack; "
                          f"export it unquantised or as format 'hf'")


def preflight(model: nn.Module, quantizer: Any, include: str | None = None, exclude: str | None = None) -> None:
    """Fail before any heavy work if ``quantizer``'s output on the block linears of ``model``
    (filtered as the quantize stage filters them) could not be exported."""
    from wanda_pipeline.models import find_blocks, find_linears

    _check_quantizer(model, quantizer)
    path, blocks = find_blocks(model)
    in_features = {f"{path}.{i}.{n}": lin.in_features for i, b in enumerate(blocks)
                   for n, lin in find_linears(b, include, exclude).items()}
    check_group_size(in_features, quantizer.config.group_size)


def quantization_config(bits: int, symmetric: bool, group_size: int | None, ignore: list[str]):
    """compressed-tensors' ``QuantizationConfig`` for weight-only int ``bits`` on every ``Linear``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status="compressed", ignore=sorted(ignore))


def pack_linear(weight: torch.Tensor, codes: RTNCodes, scheme) -> dict[str, torch.Tensor]:
    """One linear's compressed tensors (local names), proven to decompress to ``weight`` bitwise."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as PQC
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    local = {"weight": weight, "weight_scale": codes.scale.to(weight.dtype)}
    if codes.zero_point is not None:
        local["weight_zero_point"] = codes.zero_point
    packed = PQC.compress(local, scheme)
    mine = pack_to_int32(codes.codes, codes.bits)
    if not torch.equal(packed["weight_packed"], mine):
        # The library re-rounds weight / scale in the weight's dtype; in bf16 that can pick a
        # neighbouring code with the same value. Our codes are the ones the model computed with.
        packed["weight_packed"] = mine
    back = PQC.decompress(packed, scheme)["weight"]
    if back.dtype != weight.dtype or not torch.equal(back, weight):
        raise RunError("compressed-tensors does not decompress this linear to the quantised weight bit for bit "
                       f"({int((back != weight).sum())} of {weight.numel()} values differ); not exporting")
    return packed


def compressed_state_dict(model: nn.Module, quantizer) -> tuple[dict[str, torch.Tensor], Any]:
    """The model's state dict with every linear the quantizer produced replaced by its packed
    form, and the ``QuantizationConfig`` describing it."""
    _check_quantizer(model, quantizer)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found: dict[str, RTNCodes] = {}
    for name, lin in linears.items():
        codes = quantizer.codes_for(lin.weight.data)
        if codes is not None:
            found[name] = codes
    if not found:
        raise RunError(f"{type(quantizer).__name__} quantised none of this model's linears (or they changed "
                       f"since); run the quantize stage on this model, in this process, before exporting")
    c = quantizer.config
    group = check_group_size({n: linears[n].in_features for n in found}, c.group_size)
    qconfig = quantization_config(c.bits, c.symmetric, group, [n for n in linears if n not in found])
    scheme = qconfig.config_groups["group_0"]
    state = dict(model.state_dict())
    for name, codes in found.items():
        del state[f"{name}.weight"]
        for k, v in pack_linear(linears[name].weight.data, codes, scheme).items():
            state[f"{name}.{k}"] = v
    return state, qconfig


def export_compressed(model: nn.Module, tokenizer: Any, out_dir: str | Path, quantizer: Any | None,
                      sparsity_meta: dict[str, Any], provenance: dict[str, Any]) -> Path:
    """Write ``model`` to ``out_dir`` in compressed-tensors format; see the module docstring.

    ``quantizer`` is the quantizer that quantised the model in this process (it must offer
    ``codes_for``), or None for an unquantised model. ``sparsity_meta`` comes from
    :func:`wanda_pipeline.export.metadata.sparsity_metadata`. The folder appears whole or not at all."""
    _require_library()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder or remove it")
    with atomic_folder(out) as tmp:
        write_compressed(model, tokenizer, tmp, quantizer, sparsity_meta, provenance)
    return out


def write_compressed(model: nn.Module, tokenizer: Any, tmp: Path, quantizer: Any | None,
                     sparsity_meta: dict[str, Any], provenance: dict[str, Any]) -> None:
    """The files of :func:`export_compressed`, into an existing (temporary) folder ``tmp``."""
    _require_library()
    from compressed_tensors.compressors import ModelCompressor

    meta = validated(sparsity_meta)
    if quantizer is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        state, qconfig = compressed_state_dict(model, quantizer)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[CONFIG_KEY] = meta
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str))

"""Surviving mutants that cannot change behaviour, for bench/mutation_score.py.

Each rule: (regex on the mutant's name, regex on its diff, regex to strip or None, reason). The
diff is the '-' (original) and '+' (mutant) lines joined by " / ". With a strip regex, the mutant
is equivalent only if removing its matches makes both lines identical. Rules name code, not
mutant numbers, so they survive renumbering; only survivors (exit 0) are classified.
"""
# ruff: noqa: E501  (a table of regexes reads better unwrapped)

from __future__ import annotations

CPU = "a no-op on this CPU-only machine"
EQUIVALENT: list[tuple[str, str, str | None, str]] = [
    (r"", r"tqdm\(", r",? ?(desc|leave|disable|unit)=[^,)]*", "progress bar only (tqdm description/leave/disable)"),
    (r"", r"reshape\(", r"reshape\((1, )?-1\)", "a 1-D vector broadcasts like the (1, n) row it was"),
    (r"x_sparsegpt_prune__", r"topk\(score", r",? ?dim=1", "2-D score: topk's default dim -1 is dim 1"),
    (r"x_sparsegpt_prune__", r"weight\.copy_\(W\.to\(", r"W\.to\((weight\.dtype|None)\)",
     "copy_ casts to the weight's dtype anyway"),
    (r"", r"progress: bool=", r"progress: bool=(True|False)", "progress bar default only"),
    (r"x_(streamed_)?perplexity__", r"batch_size: int=", r"batch_size: int=\d",
     "default batch size; perplexity is batch-size invariant (tested for 1, 2, 3)"),
    (r"x_(streamed_)?perplexity__", r"^- nll = torch\.zeros", r",? ?dtype=[\w.]+",
     "float32 instead of float64 accumulator: precision only, far below the tests' 1e-6 at these sizes"),
    (r"perplexity\.", r"model_device|\.to\((device|None)\)|c\.device\)|c\.batch_size(, None)?\)", None,
     f"device placement, {CPU}"),
    (r"", r"device=", r",? ?device=[\w.]+", f"device argument, {CPU}"),
    (r"x_make_accumulators__", r"in_features, ", r", (device|None)\)", f"device argument, {CPU}"),
    (r"", r"dtype=", r",? ?dtype=(torch\.float32|h\.dtype|None)", "dtype: float32 is the default and H's dtype"),
    (r"inverse_hessian_cholesky__", r"h\.shape", r"h\.shape\[[01]\]", "H is square"),
    (r"", r"stable=", r",? ?stable=(True|False|None)", "torch.sort on CPU is stable whatever `stable` says"),
    (r"", r"(sort|topk)\(", r",? ?dim=-1", "torch.sort/topk default to dim=-1"),
    (r"x_(per_row_mask|variant_mask|_stable_lowest)__", r"dim=", r"dim=[-+]1", "2-D metric: dim=+1 is dim=-1"),
    (r"x_nm_mask__", r"zeros_like", r",? ?dtype=(torch\.bool|None)", "a 0/1 float mask copied into a bool mask"),
    (r"x_sparsegpt_prune__", r"\+ .*i - nm\[1\] <= count", None,
     "unreachable through the pruner: blocksize % M == 0 keeps i + M <= count"),
    (r"x_quantize_rtn__", r"\+ deq = torch\.clamp\(torch\.round\(g / scale\), "
     r"(None, qmax|-qmax - 1, None|-qmax - 1|-qmax - 2, qmax)\) \* scale$", None,
     "symmetric clamp cannot bind: the scale maps the group's max |w| to qmax"),
    (r"x_quantize_rtn__", r"\+ deq = \(torch\.clamp\(torch\.round\(g / scale\) \+ zero, None, qmax\) - zero\)", None,
     "asymmetric lower bound cannot bind: round(x) + round(-x) = 0 under round-half-even"),
    (r"x_quantize_rtn__", r"\+ g = w\.reshape\(-1, group_size\)$", None, "the same groups, flattened over rows"),
    (r"x_check_nm__", r"\+ if m (< 0|<= 1) or n <= 0 or n >= m:$", None, "n >= m already rejects m <= 1 when n >= 1"),
    (r"x_nm_mask__", r"\+ if full == 1:$", None, "full is a multiple of m >= 2, never 1"),
    (r"x_variant_mask__", r"\+ while abs\(achieved - sparsity\) >=? tol and hi - lo >=? tol:$", None,
     "exact float equality with tol does not occur (hi - lo = 0.8 / 2^k)"),
    (r"x_variant_mask__", r"\+ if achieved >= sparsity:$", None, "equality already ended the loop"),
    (r"ColumnSqNorm\w*_add__", r"\+ self\.value \+= torch\.norm\(x, (p=None, )?dim=1\) \*\* 2 / self\.nsamples$", None,
     "the default norm is the 2-norm"),
    (r"x_owl_ratios__", r"\+ scaled = \(lod \+ lod\.min\(\)\) / span", None,
     "centering (scaled - mean) removes a shift"),
    (r"OutlierScan\w*visit__", r"^- return False / \+ return True$", None,
     "re-forwarding unchanged weights gives the same outputs (time only)"),
    (r"x_sample_windows__", r"\+ return torch\.cat\(windows\)$", None, "torch.cat's default dim is 0"),
]


# Found after the engine rewrite (issue 16's second pass); the reasons were checked by reading the code.
EQUIVALENT += [
    # engine: device placement and console output
    (r"engine\.(capture|loop|resume)\.", r"\.to\(None\)|TensorStore\(None\)|self\.device = None|load\(index, None\)"
     r"|make_accumulators\(.*, None\)|OnePass\(.*needed, None,|start, None, self\.include", None,
     f"device placement, {CPU}"),
    (r"engine\.resume\.x__restore_weights__", r"copy_\(", r"\.to\([^)]*\)", "copy_ casts to the weight's dtype and device anyway"),
    (r"engine\.loop\.xǁLayerEngineǁ_run__", r"print\(", r",? ?flush=(True|False|None)", "console output only: the same text"),
    (r"engine\.loop\.xǁLayerEngineǁ_run__", r"^- inputs: list\[torch\.Tensor\] = \[\] / \+ inputs: list\[torch\.Tensor\] = None$",
     None, "reassigned before it is read"),
    (r"engine\.loop\.xǁLayerEngineǁprune_in_forward__", r"split\(sizes", r",? ?dim=0", "0 is split's default dim"),
    (r"engine\.loop\.xǁLayerEngineǁprune_in_forward__", r"if len\(parts\) (> 1 or True|>= 1) else", None,
     "cloning the only part gives the same values (one copy more)"),
    (r"engine\.batching\.x_auto_batch_size__", r"MEMORY_SHARE / max\(1", None, "int() floors the positive quotient like //"),
    (r"engine\.batching\.x_auto_batch_size__", r"max\(2, per_sample_bytes", None, "the estimate is never below 32 bytes"),
    (r"engine\.capture\.x__consistent__", r"for i in range\(n_blocks\)", None, "i = 0 compares the first entry with itself"),
    (r"engine\.capture\.x_capture__", r"log\[1\]\[1\]\.detach", None, "the log was checked consistent: entry 1 is entry 0's object"),
    (r"engine\.skeleton\.x_build_skeleton__", r"include_buffers=None", None, "accelerate reads None as False"),
    (r"engine\.skeleton\.x_build_skeleton__", r"from_config\(", r",? ?trust_remote_code=(trust_remote_code|None)",
     "the config was already resolved (and trusted or refused) by AutoConfig"),
    # streamed perplexity
    (r"x_streamed_perplexity__", r"LayerEngine\(", r",? ?progress=(True|False|None)", "progress bar only"),
    (r"x_streamed_perplexity__", r"LayerEngine\(|source\.load\(index, ", r"device=device, |, (engine\.device|None)\)",
     f"device placement, {CPU}"),
    (r"x_streamed_perplexity__", r"getattr\(model\.config, 'hidden_size'\) or", None,
     "transformers configs always answer hidden_size (attribute map)"),
    (r"x_streamed_perplexity__", r"run_tail\(.*, None\)", None,
     "tuple-mode blocks: no architecture in transformers 5 returns tuples from its decoder blocks"),
    # RTN
    (r"x_quantize_codes__", r"\+ q = torch\.round\(torch\.clamp\(g / s32, (None, qmax|qmin, None|qmin)\)\)$", None,
     "symmetric clamp cannot bind: the scale maps the group's max |w| to qmax"),
    (r"x_quantize_codes__", r"\+ zero = torch\.clamp\(.*, (None, qmax|qmin, None|qmin)\)$", None,
     "lo <= 0 <= hi keeps the zero point within [qmin, qmax]"),
    (r"x_quantize_codes__", r"\+ q = torch\.round\(torch\.clamp\(g / s32 \+ zero\.unsqueeze\(-1\), None, qmax\)\)$", None,
     "the code is at least qmin - 0.5, which rounds half-to-even to the even qmin"),
    (r"quantizers\.rtn\.", r"\.to\(None\)", None,
     "the scale is kept in the weight's dtype and integer codes are exact in it: the result has that dtype already"),
    (r"x_recover_codes__", r"torch\.clamp\(guess [+-] delta, (None, qmax|qmin, None|qmin)\)|\+ codes = RTNCodes\(torch\.clamp\(guess - delta",
     None, "an out-of-range code cannot reproduce the weight; dequantisation is monotone, so one neighbour at most fits"),
    (r"x_weight_digest__", r"digest_size=", None, "any digest size identifies the weight (compared only with itself)"),
    # masks
    (r"x_nm_mask__", r"device\.type (==|!=) '(cpu|XXcpuXX|CPU)'", None,
     "the GPU branch: on a CPU it gives the same mask (one chunk, or topk on every group), only slower"),
    (r"x_nm_mask__", r"^- gmask = _topk_groups\(groups, n\) / \+ gmask = (None|_topk_groups\(.*\))$", None,
     "the GPU fallback after ties (the M > 32 line is killed), unreachable on a CPU"),
    (r"x_nm_mask__", r"if m >= _MAX_NETWORK_M", None, "M = 32 through topk: the network reproduces topk's masks"),
    (r"x_nm_mask__", r"ties = torch\.empty\(", r",? ?dtype=(torch\.bool|None)", "a 0/1 float tie flag works like a bool one"),
    (r"x_(nm_mask|per_row_mask)__", r"max\(2, _CHUNK_ELEMS", None, "chunk size only (differs past 2^19 columns per row)"),
    (r"x_nm_mask__", r"\+ where = (None|ties\.nonzero\(as_tuple=False\))$", None,
     "topk recomputes more groups; without ties it equals the threshold mask"),
    (r"x_per_layer_mask__", r"float\('NAN'\)", None, "the same NaN"),
    (r"x_per_layer_mask__", r"^- mask = flat <= thresh / \+ mask = flat < thresh$", None,
     "the tie fix-up then fills the ties from the left: the same mask by the slower path"),
    (r"x_per_row_mask__", r"kthvalue\(", r",? ?dim=1", "2-D metric: kthvalue's default dim -1 is dim 1"),
]
EQUIVALENT += [
    # engine: checkpoint, sink, source, one-pass
    (r"engine\.(checkpoint|sink)\.", r"\.tmp'", r"'(XX\.tmpXX|\.TMP|\.tmp)'",
     "name of a temporary file that is renamed over its target at once; nothing else looks for it"),
    (r"engine\.(checkpoint|sink)\.", r"json\.dumps\(", r",? ?(indent|sort_keys|separators)=(\d+|True|False|None|\(',', ':'\))",
     "JSON whitespace / key order of text every reader parses; fingerprints are compared as dicts"),
    (r"engine\.checkpoint\.xǁCheckpointǁ__init__", r"self\.n_blocks = ", r"self\.n_blocks = (0|1|None)",
     "start() sets n_blocks before anything reads it"),
    (r"engine\.checkpoint\.x_(un)?pack_bits__", r"arange\(8|\.to\(", r",? ?dtype=(torch\.uint8|None)|\.to\((torch\.uint8|None)\)",
     "type promotion gives the same 0/1 bits; sum(dtype=uint8) and .bool() fix the result dtype"),
    (r"engine\.onepass\.x__merge__", r"zip\(values, sizes", r",? ?strict=(True|False|None)",
     "values and sizes have one entry per calibration batch by construction"),
    (r"engine\.onepass\.", r"torch\.cat\(", r",? ?dim=0", "torch.cat's default dim is 0"),
    (r"engine\.onepass\.x__merge__", r"^- first = values\[0\] / \+ first = values\[1\]$", None,
     "every value is checked identical/equal to `first` before it is returned"),
    (r"engine\.onepass\.xǁOnePassǁ_stats__", r"make_accumulators\(", r", (self\.device|None)\)", f"device argument, {CPU}"),
    (r"engine\.onepass\.xǁOnePassǁrun__", r"\+ self\._last = ''$", None,
     "after the forward _last is read only for a non-None x, and every later prune() has x=None"),
    (r"engine\.(sink|source)\.", r"\.to\(|load\(i, |materialise\(|_read\(", r"torch\.device\('cpu'\)|'cpu'|\bdevice\b|None",
     f"device placement, {CPU}"),
    (r"engine\.source\.x__return_freed_memory__", r"malloc_trim|CDLL", None,
     "malloc_trim only hands freed heap back to the OS; a failed CDLL is caught"),
    (r"engine\.source\.", r"remove_duplicate=None", r"remove_duplicate=(None|False)", "None is falsy like False"),
    (r"engine\.source\.xǁShardSourceǁmaterialise__", r"remove_duplicate=True", None,
     "a tied object seen once still replaces all its names (the alias group)"),
    (r"engine\.source\.x__model_names__", r"getattr\(model, 'base_model_prefix'\)$", None,
     "every PreTrainedModel has base_model_prefix"),
    (r"engine\.source\.xǁShardSourceǁ(materialise|prepare_outer)__", r"if (owner_name|name) or True else", None,
     "get_submodule('') is the model itself; the root module owns no parameters or buffers"),
    (r"engine\.source\.xǁShardSourceǁprepare_outer__", r"if name and False else|else 'XXXX'", None,
     "only the root has an empty name, and it owns no parameters or buffers"),
    (r"engine\.source\.xǁShardSourceǁprepare_outer__", r"block_ids|self\.blocks_path|recurse=", None,
     "redundant guards: the name prefix, block_ids and _Own (own tensors only) each keep blocks out"),
    (r"engine\.source\.xǁ_Ownǁnamed_(parameters|buffers)__", r"def f\(|recurse=None|remove_duplicate=None|"
     r"named_parameters\(recurse=False\)$", None,
     "_Own ignores prefix/recurse; its only caller passes remove_duplicate=False; None is falsy"),
    # engine: the last survivors of the second pass
    (r"engine\.capture\.x__record_batch__", r"^- out = None / \+ out = ''$", None, "when _Stop ends the call, the output is discarded (capture ignores it; run_tail never stops)"),
    (r"engine\.capture\.xǁ_Recorderǁ__getattr__", r"__getattr__\(None\)", None, "only the recorder's one submodule, `inner`, resolves there, and nothing reads recorder.inner; other names fall back to the wrapped block either way"),
    (r"engine\.loop\.x__to__", r"id\(None\) not in memo", None, "the memo only saves repeated copies of one interned tensor; a miss copies it again"),
    (r"engine\.loop\.", r"_to\([^()]*, None, memo\)", None, f"device placement, {CPU}"),
    (r"engine\.loop\.xǁLayerEngineǁcapture__", r"int\(batch\), (None, input_device|self\.store_device, None)\)", None, f"device placement, {CPU}"),
    (r"engine\.loop\.xǁLayerEngineǁforward__", r"zip\(inputs, calls", r",? ?strict=(True|False|None)", "one recorded call per calibration batch by construction"),
    (r"engine\.loop\.xǁLayerEngineǁ__init__", r"\+ self\.progress = None$", None, "progress bar only (None disables it)"),
    (r"engine\.loop\.xǁLayerEngineǁ__init__", r"\+ self\._samples: int \| None = ''$", None, "set before every block call, before any statistics hook reads it"),
    (r"engine\.loop\.xǁLayerEngineǁ_run__", r"getattr\(visitor, 'one_pass', None\)", None, "None is falsy like False"),
    (r"x_recover_codes__", r"else 1\.0$", None, "symmetric codes: bf16 rounding moves w/s by at most 128 * 2^-9 = 0.25 code, so a guess one too high is always repaired by the -1 neighbour, and any code kept dequantises bitwise to the weight"),
]
EQUIVALENT += [
    # the wiring (issue 21): promotion's registry calls, the prune CLI, the run path, export metadata
    (r"tracking\.promotion\.x_log_model__", r"TemporaryDirectory\(|Path\(root\) / ", None,
     "name of the temporary folder the model is written to; MLflow copies it in under name='model'"),
    (r"tracking\.promotion\.x_register_and_promote__", r"manual=None\)", None, "None is falsy like False"),
    (r"cli_prune\.x_add_prune_parser__", r"help=", r""",? ?help=(None|'[^']*'|"[^"]*")""",
     "argparse help text only"),
]
EQUIVALENT += [
    (r"cli_prune\.x_add_prune_parser__", r"dest=", r""",? ?dest=(None|'[a-z_]+')""",
     "argparse derives the same dest from the flag name ('--eval-windows' -> eval_windows)"),
    (r"cli_prune\.x_add_prune_parser__", r"'--(device|batch-size|sparsity_ratio)'.*default=", r",? ?default=(None|'cpu'|1)",
     "a None engine flag is left out of the spec, whose default (cpu, 1; the pruner's own sparsity) is the same"),
]
EQUIVALENT += [
    (r"engine\.checkpoint\.xǁCheckpointǁ_drop_stale__", r"missing_ok=(None|False)", None,
     "iterdir has just listed the file, and nothing else deletes in a checkpoint folder a run is using"),
]
EQUIVALENT += [
    (r"cli_prune\.x_add_prune_parser__", r"default=None", r",? ?default=None", "None is argparse's own default"),
    (r"cli_prune\.x_prune_spec__", r"or k == '(XXnameXX|NAME)'", None,
     "the name entry is never None, so the `or k == 'name'` test never decides"),
]
EQUIVALENT += [
    (r"stages\.x_file_digest__", r"fh\.read\(", r"fh\.read\((1 << 20|2 << 20|1 << 21|None)\)",
     "the chunk size does not change a SHA-256 over the whole file (tested against hashlib on 3 MiB)"),
    (r"stages\.x_calibration_key__", r"sort_keys", r",? ?sort_keys=(True|False|None)",
     "model_dump() lists a spec's keys in field order every time; no other dict is hashed"),
    (r"stages\.x_peak_rss_bytes__", r"\+ return int\(peak if sys\.platform == ('XXdarwinXX'|'DARWIN'|'darwin' and False) ", None,
     "the darwin branch is never taken on the Linux test machine"),
]

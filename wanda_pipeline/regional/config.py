"""Options of regional optimisation (block-local reconstruction). Pure pydantic, so the
pipeline spec can import it without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ReconstructConfig(BaseModel):
    """After a block is masked, optimise its kept weights so the block's output matches the
    dense block's on calibration samples (MSE, summed); the mask is re-applied after every step.
    The paper gives no defaults; the public reproduction's (RMSprop, lr 3e-7, 5 x 32 samples)
    barely moved the weights on the demo at ten times Wanda's time. These were chosen on C4
    validation perplexity (bench/results/reconstruct_tuning.md): one pass of Adam at 1e-3."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(1, ge=0, description="passes over a fresh draw of samples; 0: no optimisation")
    samples: int = Field(32, gt=0, description="calibration samples drawn per iteration; one optimiser step per "
                                               "calibration batch, so per sample with batch_size 1")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    optimizer: Literal["rmsprop", "adam", "sgd"] = Field("adam", description="torch.optim optimiser")
    seed: int = Field(0, description="seeds the draw of samples (with the block index)")

"""The layer engine: per-block inputs (capture), weights from memory or shards (source),
finished blocks into the model or out to shards (sink), resume (checkpoint), the loop."""

from wanda_pipeline.engine.block import BlockContext
from wanda_pipeline.engine.capture import Captured, capture
from wanda_pipeline.engine.checkpoint import Checkpoint
from wanda_pipeline.engine.loop import BlockVisitor, EngineReport, LayerEngine
from wanda_pipeline.engine.sink import BlockSink, ModelSink, ShardSink
from wanda_pipeline.engine.source import BlockSource, ModelSource, ShardSource, iter_blocks

__all__ = [
    "BlockContext", "BlockSink", "BlockSource", "BlockVisitor", "Captured", "Checkpoint", "EngineReport", "LayerEngine",
    "ModelSink", "ModelSource", "ShardSink", "ShardSource", "capture", "iter_blocks",
]

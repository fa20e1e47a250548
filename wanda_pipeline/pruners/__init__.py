"""Built-in pruners: thin classes over ``wanda_pipeline.sparsity``."""

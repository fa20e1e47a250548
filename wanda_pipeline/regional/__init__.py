"""Block-level pruning: regional gradients, regional optimisation (reconstruction) and the visitor that runs them."""

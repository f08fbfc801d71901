"""How squeeze chooses: in-memory sensitivity probes, per-tensor weight errors, the budget
allocator and its measured refinement, and the automatic prune searches. Choices ask measure/
for what a candidate costs and never write a results folder themselves."""

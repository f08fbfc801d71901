"""What a choice costs: perplexity/KLD, tasks, speed, drift, statistics, sensitivity probes,
allocation, automatic pruning."""

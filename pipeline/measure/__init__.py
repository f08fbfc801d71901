"""What a variant costs in quality and speed: perplexity/KLD, tasks, speed, drift, imatrix
statistics, and the calibration pass that collects activations."""

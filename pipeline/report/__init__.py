"""Tables, plots, comparisons and the model card made from scored runs."""

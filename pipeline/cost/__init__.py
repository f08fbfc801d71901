"""The cost model behind `squeeze plan --estimate`: the model's shape, this machine's measured
rates, a GPU spec table, and the price of every step of a run. FITTED.md beside this file says
which runs each fitted constant came from, so that it is judged on other runs only."""

"""``vlatlas intervene``: causal tests over a run's examples (docs/DESIGN.md, "Interventions").

``spec`` (what was asked, torch-free), ``rank`` (how regions are ranked, read from the lake),
``engine`` (the hooks and the model's score of its own answer), ``chunk`` (the chunk function),
``run`` (the driver).
"""

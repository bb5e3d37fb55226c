"""`python -m pyublk_fast.bench`: servers on the simulated driver, with same-run references."""

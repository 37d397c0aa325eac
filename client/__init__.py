"""polyak's client side: the SDK (Client, Job), trained models, sweeps, plots and the Ray-job submitter.

Empty on purpose: ``import polyak.contract.spec`` must not pull in the SDK's HTTP client (the actors import the
spec); the public names are ``polyak.Client``, ``polyak.Model`` and the rest.
"""

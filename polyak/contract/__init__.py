"""The contract every layer shares: the job spec, the wire models, the job states, the typed errors, the lists
of allowed names and what a weights file computes.

It imports pydantic and NumPy only (YAML inside the one function that reads spec text), so the gradient
workers, the parameter server, the service and the SDK can all depend on it without pulling in each other.
"""

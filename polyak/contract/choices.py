"""Every closed list of names the spec allows, in one place: the spec's fields, the numerical core, the trained
model and the data loaders all read them from here."""

from __future__ import annotations

ACTIVATIONS = ("relu", "tanh", "sigmoid")  # hidden layers; the output layer is linear
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "heavy_ball", "nesterov", "adagrad", "rmsprop", "adam")
SCHEDULES = ("constant", "inverse_time", "inverse_power")
DATA_SOURCES = ("synthetic", "sklearn", "file", "dataset")  # dataset: uploaded to a polyak server
MODES = ("sync", "async")
DEVICES = ("auto", "cpu", "gpu")
DTYPES = ("float32", "float64")

# scikit-learn's bundled datasets: name -> (features, classes), classes None for a regression target.
SKLEARN_DATASETS = {
    "digits": (64, 10),
    "iris": (4, 3),
    "wine": (13, 3),
    "breast_cancer": (30, 2),
    "diabetes": (10, None),
}
SYNTHETIC_DATASETS = ("classification", "regression")

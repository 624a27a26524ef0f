"""Ray Tune: the one trainable (`trainable`), the driver for grids and Optuna searches
(`driver`), Tune events -> the MLflow writer (`callback`), Optuna ask/tell as a Tune searcher
(`searcher`), the progress line (`progress`) and a study's status (`status`).

Import the submodules themselves: this package imports nothing at import time, so
`ablate status` does not pay for Ray."""

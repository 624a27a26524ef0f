-- Optuna keeps its own alembic_version table: it cannot share MLflow's database.
CREATE DATABASE optuna;

"""MLflow "models from code" entry point: logged with every Kiln model instead of a pickled object."""

import mlflow

from kiln.tasks.registry.pyfunc import KilnModel

mlflow.models.set_model(KilnModel())

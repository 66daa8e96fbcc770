"""A service that dies mid-command is the environment, not a bug: one line, exit 2, never a traceback."""

from __future__ import annotations

import pytest
import requests
import typer
from mlflow.exceptions import MlflowException

from kiln.cli.support import exit_codes, unreachable
from kiln.errors import ServiceUnavailable


def _mlflow_over(cause: Exception) -> MlflowException:
    try:
        try:
            raise cause
        except Exception as exc:
            raise MlflowException("API request to http://127.0.0.1:48889/api/2.0/mlflow-artifacts/x failed") from exc
    except MlflowException as exc:
        return exc


@pytest.mark.parametrize("cause", [requests.exceptions.ConnectionError("Max retries exceeded"),
                                   ConnectionResetError(104, "Connection reset by peer"),
                                   ConnectionRefusedError(111, "refused")], ids=["requests", "reset", "refused"])
def test_a_dropped_connection_anywhere_in_the_chain_names_the_service(cause):
    found = unreachable(_mlflow_over(cause))
    assert isinstance(found, ServiceUnavailable)
    assert str(found).startswith("http://127.0.0.1:48889 did not answer (")
    assert "\n" not in str(found)


def test_anything_else_stays_a_bug(capsys):
    assert unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST")) is None
    assert unreachable(ValueError("boom")) is None
    with pytest.raises(typer.Exit) as bug:
        with exit_codes():
            raise ValueError("boom")
    assert bug.value.exit_code == 1
    assert "Traceback" in capsys.readouterr().err  # a bug shows where it is
    with pytest.raises(typer.Exit) as outage:
        with exit_codes():
            raise _mlflow_over(ConnectionResetError(104, "reset"))
    assert outage.value.exit_code == 2
    assert "Traceback" not in capsys.readouterr().err

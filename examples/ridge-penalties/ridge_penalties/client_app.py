"""The user's ClientApp: rabo_flwr's client side, reading this app's scenario (which names the task)."""

from __future__ import annotations

from pathlib import Path

from rabo_flwr.client_app import client_app
from rabo_flwr.scenario import scenario_from_run_config

HERE = Path(__file__).resolve().parent

app = client_app(lambda context: scenario_from_run_config(context.run_config, app_dir=HERE))

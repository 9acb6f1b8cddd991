"""The app objects Flower loads (``fedtune.flower.apps:client_app`` / ``:server_app``)."""

from fedtune.flower.client_app import build_client_app
from fedtune.flower.server_app import build_server_app

client_app = build_client_app()
server_app = build_server_app()

"""Entry points of the fedtune Flower App (see pyproject.toml beside this file)."""

from knowledgesg.federated.flower import make_client_app, make_server_app

server = make_server_app()
client = make_client_app()

"""Entry points of the KnowledgeSG Flower App (see pyproject.toml beside this file): fedtune's
ServerApp and ClientApp, and the client stages of a run split by role (the ClientApp answers the
server's request to run them, and keeps and evaluates the releases the server publishes;
knowledgesg.federated.stages)."""

from knowledgesg.federated.flower import make_client_app, make_server_app
from knowledgesg.federated.stages import run_client_stages, take_published

server = make_server_app()
client = make_client_app(run_client_stages, take_published)

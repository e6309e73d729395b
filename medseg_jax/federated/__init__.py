"""Federated training with Flower: each site trains the global model on its own store (site.py), Flower's strategies
aggregate on the server (server.py), and the apps (apps.py) run in Flower's simulation runtime or its Deployment
Engine. Needs the `federated` extra (flwr)."""

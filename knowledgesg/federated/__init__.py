"""Federated tuning: the protocol, a client, a server loop, and the engines that carry them
(in process, Flower simulation, Flower deployment)."""

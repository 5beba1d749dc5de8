"""Database rules shared by the worker's activities and the clients (CLI, alert intake).

Clients import no activity module: what both sides need lives here.
"""

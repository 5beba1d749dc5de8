"""What every side agrees on: the boundary models, the stable names in history, the signed message.

Pure (no I/O): imported by the workflows, the activities, the clients and the configuration alike, so
the workflows can call activity methods by reference without a package cycle.
"""

"""The Flower ClientApp of fedrec (thin glue from Flower messages to ``fedrec.federated``).

This package travels inside the Flower app bundle built from the project root, not inside
the ``fedrec`` wheel.
"""

"""The Flower ServerApp and Strategy of fedrec (thin glue to ``fedrec.federated``).

This package travels inside the Flower app bundle built from the project root, not inside
the ``fedrec`` wheel.
"""

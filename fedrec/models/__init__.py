"""Models: one per file, named after it, paper cited at the top; shared blocks in
:mod:`fedrec.models.layers`. Models know nothing of federation: they declare a role per
parameter and the federated layer reads the roles."""

"""fedrec's ClientApp: each SuperNode holds a shard of users and answers three messages.

``train``     one round of local training of its users (private state kept in ``context.state``);
              under secure aggregation Flower's ``secaggplus_mod`` masks the upload; a train
              message the server marked as a simulated failure or straggler
              (``client-failure`` / ``stragglers``) gets an error reply or a late one
              (``fedrec.federated.failures.simulated_failure_mod``)
``evaluate``  valid and test summaries of its users (no raw scores leave the node)
``query``     ``init``: the initial global parameters, the parameter layout and what the node
              holds (asked once); ``info``: what the node holds; ``save-model``: save its
              private state of the best round (``model-dir``)

All work happens in :mod:`fedrec.federated.node`; this module only registers the handlers.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrec.federated import failures, node
from fedrec.federated.flower_errors import fedrec_errors_mod, install_one_line_errors

# a FedrecError (bad input on this node) is one error reply and one log line, not a traceback
app = ClientApp(mods=[fedrec_errors_mod])
install_one_line_errors()


@app.train(mods=[failures.simulated_failure_mod, node.optional_secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """Train this node's users for one round and reply with the upload."""
    return Message(node.client_train(msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate this node's users and reply with metric summaries."""
    return Message(node.client_evaluate(msg, context), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply to the server's query (initial parameters and layout, node info, save the model)."""
    return Message(node.client_query(msg, context), reply_to=msg)

"""The model registry: name -> (model class, config class).

``create_model(name, data, options, task=...)`` builds the config from flat options (see
:mod:`fedrec.config`) and the model from the data facts. Unknown names list the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fedrec.config import build_config
from fedrec.errors import ConfigError
from fedrec.models.base import ModelData, RecModel
from fedrec.models.bert4rec import BERT4Rec, BERT4RecConfig
from fedrec.models.crm import CRM, CRMConfig
from fedrec.models.dimerec import DimeRec, DimeRecConfig
from fedrec.models.elastic import Elastic, ElasticConfig
from fedrec.models.kuaiformer import KuaiFormer, KuaiFormerConfig
from fedrec.models.marm import MARM, MARMConfig
from fedrec.models.mf import MF, MFConfig
from fedrec.models.moment_cross import MomentCross, MomentCrossConfig
from fedrec.models.mrff import MRFF, MRFFConfig
from fedrec.models.popularity import Popularity
from fedrec.models.qarm import QARM, QARMConfig
from fedrec.models.sasrec import SASRec, SASRecConfig
from fedrec.models.unicdr import UniCDR, UniCDRConfig
from fedrec.models.user_ctr import UserCTR
from fedrec.registry import Registry

__all__ = ["MODELS", "ModelSpec", "create_model", "model_names"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its class, its config class (None: no options), fixed options,
    and a one-line description (default: the first line of the class's module docstring)."""

    model: type[RecModel]
    config: type | None
    fixed: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def summary(self) -> str:
        """The one-line description of the model."""
        if self.description:
            return self.description
        import sys

        doc = (sys.modules[self.model.__module__].__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


MODELS: Registry[ModelSpec] = Registry("model")
MODELS.register("sasrec")(lambda: ModelSpec(SASRec, SASRecConfig))
MODELS.register("bert4rec")(lambda: ModelSpec(BERT4Rec, BERT4RecConfig))
MODELS.register("bert4rec-last")(lambda: ModelSpec(
    SASRec, SASRecConfig, (("bidirectional", True),),
    "BERT4Rec's bidirectional encoder trained on each window's last position only (no cloze task)."))
MODELS.register("kuaiformer")(lambda: ModelSpec(KuaiFormer, KuaiFormerConfig))
MODELS.register("dimerec")(lambda: ModelSpec(DimeRec, DimeRecConfig))
MODELS.register("elastic")(lambda: ModelSpec(Elastic, ElasticConfig))
MODELS.register("crm")(lambda: ModelSpec(CRM, CRMConfig))
MODELS.register("marm")(lambda: ModelSpec(MARM, MARMConfig))
MODELS.register("moment_cross")(lambda: ModelSpec(MomentCross, MomentCrossConfig))
MODELS.register("mrff")(lambda: ModelSpec(MRFF, MRFFConfig))
MODELS.register("mf")(lambda: ModelSpec(MF, MFConfig))
MODELS.register("qarm")(lambda: ModelSpec(QARM, QARMConfig))
MODELS.register("popularity")(lambda: ModelSpec(Popularity, None))
MODELS.register("unicdr")(lambda: ModelSpec(UniCDR, UniCDRConfig))
MODELS.register("user_ctr")(lambda: ModelSpec(UserCTR, None))


def model_names() -> list[str]:
    """Registered model names."""
    return MODELS.names()


def create_model(name: str, data: ModelData, options: Mapping[str, Any] | None = None, *, task: str) -> RecModel:
    """Build model ``name`` for ``task`` from flat ``options`` (kebab- or snake-case keys)."""
    spec = MODELS.create(name)
    if task not in spec.model.tasks:
        raise ConfigError(f"model '{name}' does not support task '{task}' (it supports: {', '.join(spec.model.tasks)})")
    if spec.config is None:
        if options:
            raise ConfigError(f"model '{name}' takes no options (got {', '.join(options)})")
        return spec.model(data)
    cfg = build_config(spec.config, options, where=f"model '{name}'", task=task, **dict(spec.fixed))
    return spec.model(data, cfg)

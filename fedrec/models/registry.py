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
    a one-line description (default: the first line of the class's module docstring) and
    its paper, cited short (first author, venue, year; "" for a baseline of no paper)."""

    model: type[RecModel]
    config: type | None
    fixed: tuple[tuple[str, Any], ...] = ()
    description: str = ""
    paper: str = ""

    def summary(self) -> str:
        """The one-line description of the model, with its paper when it has one."""
        text = self.description
        if not text:
            import sys

            doc = (sys.modules[self.model.__module__].__doc__ or "").strip().splitlines()
            text = doc[0] if doc else ""
        return f"{text.rstrip('.')} ({self.paper})" if self.paper else text


MODELS: Registry[ModelSpec] = Registry("model")
MODELS.register("sasrec")(lambda: ModelSpec(SASRec, SASRecConfig, paper="Kang & McAuley, ICDM 2018"))
MODELS.register("bert4rec")(lambda: ModelSpec(BERT4Rec, BERT4RecConfig, paper="Sun et al., CIKM 2019"))
MODELS.register("bert4rec-last")(lambda: ModelSpec(
    SASRec, SASRecConfig, (("bidirectional", True),),
    "BERT4Rec's bidirectional encoder trained on each window's last position only (no cloze task).",
    paper="Sun et al., CIKM 2019"))
MODELS.register("kuaiformer")(lambda: ModelSpec(KuaiFormer, KuaiFormerConfig, paper="Liu et al., arXiv 2024"))
MODELS.register("dimerec")(lambda: ModelSpec(DimeRec, DimeRecConfig, paper="Li et al., WSDM 2025"))
MODELS.register("elastic")(lambda: ModelSpec(Elastic, ElasticConfig, paper="Deng et al., arXiv 2024, withdrawn"))
MODELS.register("crm")(lambda: ModelSpec(CRM, CRMConfig, paper="Liu et al., arXiv 2024"))
MODELS.register("marm")(lambda: ModelSpec(MARM, MARMConfig, paper="Lv et al., arXiv 2024"))
MODELS.register("moment_cross")(lambda: ModelSpec(MomentCross, MomentCrossConfig, paper="Cao et al., arXiv 2024"))
MODELS.register("mrff")(lambda: ModelSpec(MRFF, MRFFConfig, paper="Zhang et al., AAAI 2025"))
MODELS.register("mf")(lambda: ModelSpec(MF, MFConfig, paper="Koren et al., IEEE Computer 2009"))
MODELS.register("qarm")(lambda: ModelSpec(QARM, QARMConfig, paper="Luo et al., CIKM 2025"))
MODELS.register("popularity")(lambda: ModelSpec(Popularity, None))
MODELS.register("unicdr")(lambda: ModelSpec(UniCDR, UniCDRConfig, paper="Cao et al., WSDM 2023"))
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

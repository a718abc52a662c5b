"""Everything the routes need, built once per app (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass

from bebop_spec.backends import ServingBackend
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.metrics import ServerMetrics
from bebop_spec.server.serving.common import AdmissionGate
from bebop_spec.server.serving.control import ControlServing
from bebop_spec.server.serving.generate import GenerateServing
from bebop_spec.server.serving.info import InfoServing
from bebop_spec.server.serving.openai import OpenAIServing
from bebop_spec.server.serving.tokens import TokensServing
from bebop_spec.server.serving.weight_transfer import WeightTransferServing
from bebop_spec.server.serving.weights import WeightServing


@dataclass
class ServerState:
    engine: ServingBackend
    config: ServerConfig
    metrics: ServerMetrics
    openai: OpenAIServing
    generate: GenerateServing
    weights: WeightServing
    control: ControlServing
    weight_transfer: WeightTransferServing
    tokens: TokensServing
    info: InfoServing

    @classmethod
    def build(cls, engine: ServingBackend, config: ServerConfig) -> ServerState:
        metrics = ServerMetrics(engine, config.served_model_name)
        gate = AdmissionGate()  # one for both dialects: vLLM's pause(wait) holds them all
        openai = OpenAIServing(engine, config, metrics, gate)
        weights = WeightServing(engine, config, metrics)
        control = ControlServing(engine, config, gate, openai)
        return cls(
            engine=engine,
            config=config,
            metrics=metrics,
            openai=openai,
            generate=GenerateServing(engine, config, metrics, gate),
            weights=weights,
            control=control,
            weight_transfer=WeightTransferServing(weights, control),
            tokens=TokensServing(openai),
            info=InfoServing(engine, config, control),
        )

"""ServerState: what the routes share (settings, engine, services), kept on `app.state.server`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from model_runtime.engine_client import EngineClient
from server.chat import ChatService
from server.errors import NotFoundError
from server.media import MediaFetcher
from server.metrics import Metrics
from server.protocol import ModelCard, ModelList
from server.settings import Settings


@dataclass
class ServerState:
    """One per app; `draining` flips once, on SIGTERM or shutdown."""

    settings: Settings
    engine: EngineClient
    model_names: list[str]
    metrics: Metrics
    fetcher: MediaFetcher
    chat: ChatService
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine.health == "ready"

    def model_card(self, name: str) -> ModelCard:
        if name not in self.model_names:
            raise NotFoundError(f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return ModelCard(id=name, created=self.created, max_model_len=self.engine.info.max_model_len)

    def model_list(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.model_names])

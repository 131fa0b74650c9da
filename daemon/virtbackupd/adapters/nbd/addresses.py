"""Where an NBD server listens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"nbd+unix:///?socket={self.path}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int = 10809

    def __str__(self) -> str:
        return f"nbd://{self.host}:{self.port}"


Address = UnixAddress | TcpAddress

"""Transports (axis 3): in-process (simulator, tests); gRPC coordinator and hivemind DHT come next."""
from node.transport.base import Membership, RoundResult, Transport
from node.transport.inprocess import InProcessHub, InProcessTransport

__all__ = ["Membership", "RoundResult", "Transport", "InProcessHub", "InProcessTransport"]

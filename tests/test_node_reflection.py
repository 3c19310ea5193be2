"""Generic gRPC tools can discover and call ferry-node without Ferry's generated code."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from cluster import Cluster, NodeProcess
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    c = Cluster()
    try:
        yield c.node("reflected", vcpus=3, memory="256M")
    finally:
        c.close()


def test_reflection_lists_the_services(node: NodeProcess) -> None:
    with grpc.insecure_channel(node.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "ferry.v1.NodeAgent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_a_reflection_client_calls_node_info(node: NodeProcess) -> None:
    with grpc.insecure_channel(node.address) as channel:
        # A pool of its own, filled only from the server: nothing of protos/ is used.
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("ferry.v1.NodeAgent")
        method = service.methods_by_name["NodeInfo"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply = call(request_class(), timeout=10)
    assert reply.name == "reflected"
    assert reply.address == node.address
    assert reply.capacity.vcpus == 3
    assert reply.capacity.memory_bytes == 256 << 20


def test_health_reports_serving_for_the_node_agent(node: NodeProcess) -> None:
    with grpc.insecure_channel(node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="ferry.v1.NodeAgent"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

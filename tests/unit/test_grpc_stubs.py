"""The committed gRPC stubs (deploy/grpc_gen/) are what grpcio-tools makes of the .proto now."""

from raymoe.deploy import grpc_stubs


def test_committed_stubs_equal_a_fresh_compile():
    fresh = grpc_stubs.compile_stubs()
    for name, text in fresh.items():
        committed = (grpc_stubs.GEN_DIR / name).read_text()
        assert committed == text, f"{name} is stale: run `python -m raymoe.deploy.grpc_stubs --write`"
    assert (grpc_stubs.GEN_DIR / "__init__.py").read_text() == grpc_stubs.INIT


def test_the_service_is_the_proto_package_s():
    assert grpc_stubs.SERVICE == "raymoe.RaymoeService"
    assert grpc_stubs.raymoe_pb2.DESCRIPTOR.services_by_name["RaymoeService"].full_name == grpc_stubs.SERVICE

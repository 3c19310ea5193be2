"""Proto package ``ferry.v1``: the generated ``*_pb2`` and ``*_pb2_grpc`` modules."""

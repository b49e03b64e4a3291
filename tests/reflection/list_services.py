"""Lists a gRPC server's services and methods through server reflection, as
Python's grpcio-reflection client does (grpc.reflection.v1alpha)."""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

channel = grpc.insecure_channel(sys.argv[1])
database = ProtoReflectionDescriptorDatabase(channel)
pool = DescriptorPool(database)
for service in database.get_services():
    print(service)
    for method in pool.FindServiceByName(service).methods:
        print(f"{service}/{method.name}")

"""Tests of the Avro contracts, the registry manifest and the codec (schemas/)."""

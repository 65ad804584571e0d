"""Data: sources → formats → templates/tokenize → packing → batches."""

"""Outside file formats, read and written by dinb itself: the protobuf wire format, MindSpore's
protobuf strategy file, safetensors, and checked access to the JSON these files carry.

This is the lowest layer above the errors: it knows nothing of layouts or strategies, so both
the strategy layer and the checkpoint layer build on it. Every reader treats its bytes as
untrusted and raises a typed error naming the file and the record.
"""

"""Raw datasets in, validated numpy samples out; the registry of readers is in `registry`."""

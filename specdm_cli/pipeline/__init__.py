"""The stages of the pipeline, one folder each: prepare, train, synthesize, benchmark; runs holds run dirs."""

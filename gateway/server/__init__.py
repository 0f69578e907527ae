"""The gateway server: query servicer, planning, merging, error mapping and process lifecycle."""

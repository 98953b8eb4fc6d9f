"""The model runtime: registry, batching, packing, placement, plugins, model folders, the runtime process's link."""

"""Host side: request state, scheduler, block manager, engine loop, output processing."""

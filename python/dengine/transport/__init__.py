"""How nodes reach each other: the wire codec and the gRPC peer transport."""

"""Past one machine: media nodes registered in Redis behind stateless fronts
(``cluster.role``; docs/scale-out.md)."""

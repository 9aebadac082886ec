# Directory paths the modules share.
{ lib }:
{
  # dir is parent itself or lies below it
  inside = parent: dir: dir == parent || lib.hasPrefix "${parent}/" dir;
  # where EXO keeps its models: services.exo.modelsDir, by default below the data dir
  modelsDir = cfg: if cfg.modelsDir == null then "${cfg.security.dataDir}/models" else cfg.modelsDir;
}

{
  description = "orchestrator: one project.yaml -> CUDA 12.4 and CPU images in an OCI registry (dev shell)";

  # nixos-24.05: its default python3 is 3.11, so every python311Packages entry
  # below comes from the binary cache instead of being built locally.
  # `nix develop` writes flake.lock on first use; commit it to pin the revision.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      devShells = forAllSystems (pkgs:
        let
          inherit (pkgs) lib;
          # Attributes not every nixpkgs revision has. Whatever is missing (or
          # older than pyproject.toml asks) is pip-installed into .venv below.
          maybe = set: name: lib.optional (builtins.hasAttr name set) set.${name};

          python = pkgs.python311.withPackages (ps:
            (with ps; [ pip invoke docker pyyaml packaging requests jsonschema rich pytest ])
            ++ maybe ps "testcontainers"
            ++ maybe ps "check-jsonschema");

          # `invoke engine.up` starts the embedded registry as `docker-registry
          # serve CONFIG` (Debian's name); nixpkgs ships the same program as
          # distribution's `registry`.
          docker-registry = pkgs.writeShellScriptBin "docker-registry" ''
            exec ${pkgs.distribution}/bin/registry "$@"
          '';
        in
        {
          default = pkgs.mkShell {
            packages = [
              python
              pkgs.uv # the CLI; .venv gets uv>=0.4 from PyPI and comes first on PATH
              pkgs.docker # CLI with the buildx plugin, and dockerd for `engine.up` as root
              docker-registry
              (pkgs.qemu-user or pkgs.qemu) # arm64 builds; binfmt itself is host config
            ] ++ maybe pkgs "mmdebstrap"; # bootstraps a base when none can be pulled

            shellHook = ''
              # `nix develop` points SSL_CERT_FILE at a file that does not exist;
              # pip, requests and the builds' CA secret need a real bundle.
              if [ ! -f "$SSL_CERT_FILE" ]; then
                if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
                  export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
                else
                  export SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt
                fi
              fi

              if [ -f pyproject.toml ] && [ -d orchestrator ]; then
                if ! { [ -x .venv/bin/python ] && .venv/bin/python -c "import orchestrator, pytest" 2>/dev/null; }; then
                  echo "creating .venv: pip install -e '.[test]'" >&2
                  python3 -m venv --system-site-packages .venv \
                    && .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' \
                    || echo "pip install failed; fix it and re-enter the shell" >&2
                fi
                [ -f .venv/bin/activate ] && . .venv/bin/activate
              else
                echo "run nix develop from the repository root to get .venv" >&2
              fi

              cat >&2 <<'EOF'
              orchestrator dev shell (python 3.11, docker, uv, qemu, mmdebstrap)
                invoke engine.up                  Docker Engine + registry on 127.0.0.1:5000 + pinned base (root)
                invoke lock [--check]             hashed requirement locks under locks/
                invoke render [--check]           Dockerfiles under dockerfiles/
                invoke build --backend cuda|cpu|all   build and push the images
                invoke publish                    indexes + backend manifests in the registry
                invoke smoke                      launch every variant and check it
                invoke select --service tts       which image this host should run, and why
                pytest -q                         tests (engine tests need engine.up)
              EOF
            '';
          };
        });
    };
}

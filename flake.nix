{
  description = "orchestrator: one project.yaml -> CUDA 12.4 and CPU images in an OCI registry";

  # nixos-24.05: its default python3 is 3.11, so every python311Packages entry
  # below comes from the binary cache instead of being built locally.
  # flake.lock pins the revision; `nix flake update` moves it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # Everything the outputs share, for one system's package set.
      toolsFor = pkgs:
        let
          inherit (pkgs) lib;
          # Attributes not every nixpkgs revision has. Whatever is missing (or
          # older than pyproject.toml asks) is pip-installed into .venv by the
          # dev shell, and relaxed or dropped by the package below.
          maybe = set: name: lib.optional (builtins.hasAttr name set) set.${name};

          python = pkgs.python311;
          # pyproject.toml's [project.dependencies], from nixpkgs.
          runtimeDeps = ps: (with ps; [ invoke docker pyyaml packaging requests jsonschema rich isal zstandard cyclonedx-python-lib cryptography ]) ++ maybe ps "uv" ++ maybe ps "testcontainers";
          testDeps = ps: [ ps.pytest ] ++ maybe ps "check-jsonschema" ++ maybe ps "securesystemslib";

          # `invoke engine.up` starts the embedded registry as `docker-registry
          # serve CONFIG` (Debian's name); nixpkgs ships the same program as
          # distribution's `registry`.
          docker-registry = pkgs.writeShellScriptBin "docker-registry" ''
            exec ${pkgs.distribution}/bin/registry "$@"
          '';

          # User-mode emulators: arm64 bases are bootstrapped, and arm64
          # containers run, under QEMU. A static build is what binfmt_misc's F
          # flag needs inside containers; older revisions have only `qemu`.
          qemu-user = pkgs.pkgsStatic.qemu-user or (pkgs.qemu-user or pkgs.qemu);
          # Debian's names for them, which engine.up and mmdebstrap look for.
          qemu-static = arch: pkgs.writeShellScriptBin "qemu-${arch}-static" ''
            exec ${qemu-user}/bin/qemu-${arch} "$@"
          '';

          # binfmt_misc registration is host configuration (on NixOS:
          # boot.binfmt.emulatedSystems). Elsewhere engine.up calls Debian's
          # `update-binfmts --enable qemu-ARCH`; this does the same with the
          # kernel interface, with the F flag so containers find the emulator.
          update-binfmts = pkgs.writeShellScriptBin "update-binfmts" ''
            set -eu
            [ "''${1:-}" = "--enable" ] && [ -n "''${2:-}" ] || { echo "usage: update-binfmts --enable qemu-aarch64|qemu-x86_64" >&2; exit 2; }
            dir=/proc/sys/fs/binfmt_misc
            [ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir"
            [ -e "$dir/$2" ] && exit 0
            case "$2" in
              qemu-aarch64) rule=':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:${qemu-user}/bin/qemu-aarch64:FP' ;;
              qemu-x86_64) rule=':qemu-x86_64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00:\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:${qemu-user}/bin/qemu-x86_64:FP' ;;
              *) echo "update-binfmts: unknown format $2" >&2; exit 2 ;;
            esac
            printf '%s' "$rule" > "$dir/register"
          '';

          # arch-test (mmdebstrap's check that a foreign architecture runs) is
          # not in nixpkgs. Debian's package is architecture-independent: a
          # shell script, a Perl script and tiny static ELF helpers.
          arch-test = pkgs.stdenv.mkDerivation {
            pname = "arch-test";
            version = "0.20-1";
            src = pkgs.fetchurl {
              url = "mirror://debian/pool/main/a/arch-test/arch-test_0.20-1_all.deb";
              hash = "sha256-+LRln+7yMJXjyfZ41WB/NPPbaXKuZhnFP/myjckgpy4=";
            };
            nativeBuildInputs = [ pkgs.dpkg ];
            buildInputs = [ pkgs.perl pkgs.bash ];
            unpackPhase = "dpkg-deb -x $src .";
            dontBuild = true;
            installPhase = ''
              mkdir -p $out
              cp -r usr/bin usr/lib usr/share $out/
              substituteInPlace $out/bin/arch-test --replace /usr/lib/arch-test/ $out/lib/arch-test/
            '';
            dontStrip = true; # the helpers are hand-made ELF files for other architectures
            meta = {
              description = "Detect architectures this machine can run (Debian's arch-test)";
              mainProgram = "arch-test";
              platforms = lib.platforms.linux;
            };
          };

          # nixpkgs wraps mmdebstrap with a fixed PATH; engine.up needs it to
          # see arch-test and the QEMU emulators from the shell's PATH too.
          mmdebstrap = pkgs.mmdebstrap.overrideAttrs (old: {
            installPhase = builtins.replaceStrings [ "--set PATH " ] [ "--prefix PATH : " ] (old.installPhase or "");
          });

          orchestrator = python.pkgs.buildPythonApplication {
            pname = "orchestrator";
            version = "0.1.0";
            format = "pyproject";
            src = self;
            nativeBuildInputs = [ python.pkgs.setuptools pkgs.makeWrapper ]
              ++ maybe python.pkgs "pythonRelaxDepsHook";
            propagatedBuildInputs = runtimeDeps python.pkgs;
            # Minimum versions are the ones pyproject.toml was tested with;
            # nixpkgs' pinned ones are what this package is built and checked
            # against. uv comes from pkgs.uv when no python package wraps it.
            # isal is pinned exactly there (requirements/tool.lock for pip):
            # another isal may compress to other bytes, so layers made here can
            # get other blob digests (the codec key names the version, so the
            # blob caches never mix them).
            pythonRelaxDeps = true;
            pythonRemoveDeps = lib.optional (!(builtins.hasAttr "uv" python.pkgs)) "uv";
            # bin/orchestrator is pyproject's console script (orchestrator.cli:main): the
            # tasks, options, help and exit codes of `invoke` in a checkout. The wrapper
            # puts uv on its PATH (`orchestrator lock` runs it).
            makeWrapperArgs = [ "--prefix" "PATH" ":" (lib.makeBinPath [ pkgs.uv ]) ];
            doCheck = false; # checks.unit runs the unit tests
            pythonImportsCheck = [ "orchestrator" "orchestrator.cli" ];
            meta = {
              description = "One project.yaml to reproducible CUDA/CPU service images in an OCI registry";
              mainProgram = "orchestrator";
              platforms = lib.platforms.linux;
            };
          };

          # Every external command the tasks call (tests/unit/test_flake.py keeps
          # the list and checks it against orchestrator/).
          tools = [
            pkgs.uv # the CLI; .venv gets uv>=0.4 from PyPI and comes first on PATH
            pkgs.docker # the CLI with the buildx plugin, and dockerd for `engine.up` as root
            docker-registry
            pkgs.skopeo # inspecting and copying images in registries by hand
            qemu-user
            (qemu-static "aarch64")
            (qemu-static "x86_64")
            update-binfmts
            mmdebstrap # bootstraps a base when none can be pulled
            arch-test
            pkgs.util-linux # mount (binfmt_misc)
            pkgs.gnupg # gpgv: the Debian archive's InRelease signature (system packages)
            pkgs.hadolint # tests: lint of the generated Dockerfiles
          ];
        in
        { inherit python runtimeDeps testDeps orchestrator tools arch-test update-binfmts; };
    in
    {
      packages = forAllSystems (pkgs:
        let t = toolsFor pkgs; in {
          default = t.orchestrator;
          orchestrator = t.orchestrator;
          arch-test = t.arch-test;
        });

      devShells = forAllSystems (pkgs:
        let
          t = toolsFor pkgs;
          python = t.python.withPackages (ps: [ ps.pip ] ++ t.runtimeDeps ps ++ t.testDeps ps);
        in
        {
          default = pkgs.mkShell {
            packages = [ python ] ++ t.tools;

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
              orchestrator dev shell (python 3.11, docker, uv, skopeo, qemu, mmdebstrap, arch-test)
                invoke doctor                     what this machine lacks, and how to fix it
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

      # `nix flake check`: the unit tests (no engine, no network) over the source.
      checks = forAllSystems (pkgs:
        let
          t = toolsFor pkgs;
          python = t.python.withPackages (ps: t.runtimeDeps ps ++ t.testDeps ps);
        in
        {
          unit = pkgs.runCommand "orchestrator-unit-tests"
            { nativeBuildInputs = [ python pkgs.uv pkgs.hadolint ]; } ''
            cp -r ${self} src
            chmod -R u+w src
            cd src
            export HOME=$TMPDIR
            python -m pytest -q -p no:cacheprovider tests/unit
            touch $out
          '';
          package = t.orchestrator;
        });
    };
}

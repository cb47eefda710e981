{
  "targets": [
    {
      "target_name": "obfuscatune_native",
      "sources": [
        "src/addon.cc",
        "src/gemm.cc",
        "src/threadpool.cc",
        "src/elementwise.cc",
        "src/elementwise_generic.cc",
        "src/kernel_generic.cc",
        "src/kernel_avx2.cc",
        "src/kernel_avx512.cc"
      ],
      "defines": [
        "NAPI_VERSION=8"
      ],
      "cflags": [
        "-O3",
        "-fno-math-errno", "-fno-trapping-math",
        "-pthread",
        "-Wno-maybe-uninitialized"
      ],
      "cflags!": [
        "-O2"
      ],
      "cflags_cc": [
        "-O3",
        "-fno-math-errno", "-fno-trapping-math",
        "-std=gnu++17",
        "-pthread"
      ],
      "cflags_cc!": [
        "-O2"
      ],
      "ldflags": [
        "-pthread"
      ],
      "conditions": [
        [
          "OS=='mac'",
          {
            "xcode_settings": {
              "GCC_OPTIMIZATION_LEVEL": "3",
              "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
              "MACOSX_DEPLOYMENT_TARGET": "11.0"
            }
          }
        ],
        [
          "OS=='win'",
          {
            "msvs_settings": {
              "VCCLCompilerTool": {
                "Optimization": 2,
                "AdditionalOptions": [
                  "/std:c++17"
                ]
              }
            }
          }
        ],
        [
          "target_arch=='x64' and OS!='win'",
          {
            "dependencies": [
              "obfuscatune_ew_avx2",
              "obfuscatune_ew_avx512"
            ]
          }
        ]
      ]
    },
    {
      "target_name": "obfuscatune_ew_avx2",
      "type": "static_library",
      "sources": [
        "src/elementwise_avx2.cc"
      ],
      "cflags": [
        "-O3",
        "-fno-math-errno", "-fno-trapping-math",
        "-fPIC",
        "-mavx2",
        "-mfma",
        "-mbmi2"
      ],
      "cflags!": [
        "-O2"
      ],
      "cflags_cc": [
        "-O3",
        "-fno-math-errno", "-fno-trapping-math",
        "-fPIC",
        "-std=gnu++17",
        "-mavx2",
        "-mfma",
        "-mbmi2"
      ],
      "cflags_cc!": [
        "-O2"
      ],
      "xcode_settings": {
        "OTHER_CPLUSPLUSFLAGS": [
          "-mavx2",
          "-mfma",
          "-mbmi2"
        ],
        "GCC_OPTIMIZATION_LEVEL": "3"
      }
    },
    {
      "target_name": "obfuscatune_ew_avx512",
      "type": "static_library",
      "sources": [
        "src/elementwise_avx512.cc"
      ],
      "cflags": [
        "-O3",
        "-fno-math-errno", "-fno-trapping-math",
        "-fPIC",
        "-mavx512f",
        "-mavx512vl",
        "-mavx512bw",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mbmi2"
      ],
      "cflags!": [
        "-O2"
      ],
      "cflags_cc": [
        "-O3",
        "-fno-math-errno", "-fno-trapping-math",
        "-fPIC",
        "-std=gnu++17",
        "-mavx512f",
        "-mavx512vl",
        "-mavx512bw",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mbmi2"
      ],
      "cflags_cc!": [
        "-O2"
      ],
      "xcode_settings": {
        "OTHER_CPLUSPLUSFLAGS": [
          "-mavx512f",
          "-mavx512vl",
          "-mavx512bw",
          "-mavx512dq",
          "-mavx2",
          "-mfma",
          "-mbmi2"
        ],
        "GCC_OPTIMIZATION_LEVEL": "3"
      }
    }
  ]
}
{
  "targets": [
    {
      "target_name": "obfuscatune_native",
      "sources": [
        "src/addon.cc",
        "src/gemm.cc",
        "src/threadpool.cc",
        "src/kernel_generic.cc",
        "src/kernel_avx2.cc",
        "src/kernel_avx512.cc"
      ],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O3", "-pthread", "-Wno-maybe-uninitialized"],
      "cflags!": ["-O2"],
      "cflags_cc": ["-O3", "-std=gnu++17", "-pthread"],
      "cflags_cc!": ["-O2"],
      "ldflags": ["-pthread"],
      "conditions": [
        ["OS=='mac'", {
          "xcode_settings": {
            "GCC_OPTIMIZATION_LEVEL": "3",
            "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
            "MACOSX_DEPLOYMENT_TARGET": "11.0"
          }
        }],
        ["OS=='win'", {
          "msvs_settings": {
            "VCCLCompilerTool": { "Optimization": 2, "AdditionalOptions": ["/std:c++17"] }
          }
        }]
      ]
    }
  ]
}
